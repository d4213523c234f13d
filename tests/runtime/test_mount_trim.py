"""The launcher's mount namespace holds only what bubblewrap can reach (native/mount_trim.c).

bubblewrap reads its whole mount table for each of its mounts, so every host mount used to make
every create slower (docs/benchmarks.md). The launcher of a root service now detaches, in its
own namespace, each mount bubblewrap has no use for. The attacks here are on what it must keep:
a bind's source that is a mount with another mount beneath it (the bind is recursive), a source
reached through a symlink into a different mount, and the host's own table, which must not
change. Root only (the launcher has a mount namespace of its own only with a uid range)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from one_sandbox import sh

from aviato.runtime.bubblewrap import BubblewrapRuntime, BubblewrapSandbox
from aviato.runtime.model import DirectoryMount, SandboxConfig
from aviato.runtime.mount_tools import mount_points
from aviato.runtime.supervisor import supervisor_binary

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the launcher trims only as root")

NOISE = 40


def _monitor_mount_points(pid: int) -> list[str]:
    """The mount points bwrap (the sandbox's host-side monitor, in the launcher's namespace)
    sees; the test's paths have no characters that mountinfo escapes."""
    lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines]


def _tmpfs(at: Path, file: str) -> None:
    at.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(at)], check=True)
    (at / file).write_text(file)


@pytest.fixture
def planted() -> Iterator[Path]:
    """A directory with NOISE unrelated tmpfs mounts under noise/, a mount src/ with a file and
    a mount beneath it (src/sub/), a mount elsewhere/ and a symlink link -> elsewhere. Under
    /tmp and searchable by all: bubblewrap runs as the sandbox's unprivileged host uid."""
    tmp_path = Path(tempfile.mkdtemp(prefix="avtrim", dir="/tmp"))
    tmp_path.chmod(0o755)
    made: list[Path] = []
    try:
        for i in range(NOISE):
            _tmpfs(tmp_path / "noise" / str(i), "noise.txt")
            made.append(tmp_path / "noise" / str(i))
        _tmpfs(tmp_path / "src", "top.txt")
        made.append(tmp_path / "src")
        _tmpfs(tmp_path / "src" / "sub", "deep.txt")
        made.append(tmp_path / "src" / "sub")
        _tmpfs(tmp_path / "elsewhere", "far.txt")
        made.append(tmp_path / "elsewhere")
        (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
        yield tmp_path
    finally:
        for at in reversed(made):
            subprocess.run(["umount", "-l", str(at)], check=False)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_launcher_keeps_what_bwrap_binds_and_detaches_the_rest(
    planted: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state = tmp_path_factory.mktemp("trim-state")
    host_before = mount_points()

    async def main() -> tuple[str, list[str]]:
        rt = BubblewrapRuntime(state, supervisor=supervisor_binary())
        try:
            if rt._userns is None:
                pytest.skip("this runtime gives sandboxes no uid range of their own")
            mounts = (
                DirectoryMount(path="/data", host_path=str(planted / "src"),
                               source=str(planted / "src"), read_only=True),
                DirectoryMount(path="/far", host_path=str(planted / "link"),
                               source=str(planted / "link"), read_only=True),
            )  # fmt: skip
            config = SandboxConfig(sandbox_id="t-" + uuid.uuid4().hex[:12], image="host",
                                   command=("sh", "-c", "sleep infinity", "--bind",
                                            str(planted / "noise" / "0"), "/x"),
                                   env={}, working_dir="",
                                   mounts=mounts)  # fmt: skip
            h = await rt.create(config)
            assert isinstance(h, BubblewrapSandbox)
            seen = await asyncio.wait_for(
                sh(h, "cat /data/top.txt /data/sub/deep.txt /far/far.txt"), 60
            )
            return seen, _monitor_mount_points(h.pid)
        finally:
            for sid in rt.list_present():
                await rt.cleanup(sid)
            await rt.close()

    seen, monitor = asyncio.run(main())
    # What the binds reach is all there: the mount beneath a source, the mount behind a symlink.
    # Paths in the sandbox's own command are never taken for bubblewrap's (nor resolved as host
    # root): the noise mount its command names went too.
    assert seen == "top.txtdeep.txtfar.txt"
    noise = str(planted / "noise")
    assert not [m for m in monitor if m.startswith(noise + "/")], "unrelated mounts were kept"
    assert str(planted / "src") in monitor and str(planted / "src" / "sub") in monitor
    assert str(planted / "elsewhere") in monitor
    # The host's own table is untouched: every planted mount is still there.
    host_after = mount_points()
    assert sum(m.startswith(noise + "/") for m in host_after) == NOISE
    assert set(host_before) <= set(host_after)


# Every option the runtime's Python may put on a command line of bubblewrap's, the launcher's
# or the supervisor's, by kind. A new bubblewrap option must be placed here and in
# mount_trim.c's table (with its number of arguments and of host paths among them): a command
# line with an option the table lacks is not trimmed, and one whose host path the table does
# not know as such may lose the mount that path lies on.
HOST_PATH_OPTIONS = {"--bind", "--bind-try", "--ro-bind", "--ro-bind-try", "--dev-bind",
                     "--dev-bind-try", "--overlay-src", "--overlay"}  # fmt: skip
OTHER_BWRAP_OPTIONS = {"--args", "--as-pid-1", "--cap-add", "--cap-drop", "--chdir",
                       "--clearenv", "--dev", "--dir", "--disable-userns", "--gid", "--hostname",
                       "--new-session", "--perms", "--proc", "--remount-ro", "--seccomp",
                       "--setenv", "--size", "--symlink", "--tmpfs", "--uid",
                       "--unshare-cgroup-try", "--unshare-ipc", "--unshare-net", "--unshare-pid",
                       "--unshare-user", "--unshare-uts"}  # fmt: skip
NOT_BWRAP = {"--version", "--egress", "--keepalive", "--user", "--protected-id",  # supervisor's
             "--launch", "--cgroup-procs", "--cgroup-tasks", "--oom-score-adj", "--stage",
             "--stage-volumes", "--volume", "--detach", "--layer", "--userns",
             "--zygote"}  # the launcher's own, before bubblewrap's command line  # fmt: skip
RUNTIME = Path(__file__).resolve().parents[2] / "src" / "aviato" / "runtime"


def test_every_bwrap_option_is_in_the_trimmings_table_with_its_host_paths() -> None:
    top = [RUNTIME / name for name in ("image_roots.py", "oci_image_root.py", "host_mounts.py")]
    argv_modules = [*top, *sorted((RUNTIME / "bubblewrap").glob("*.py"))]
    used: set[str] = set()
    for module in argv_modules:
        used |= set(re.findall(r'"(--[a-z][a-z0-9-]*)"', module.read_text()))
    unplaced = used - HOST_PATH_OPTIONS - OTHER_BWRAP_OPTIONS - NOT_BWRAP
    assert not unplaced, f"place these options in one of the sets above: {unplaced}"
    trim = (RUNTIME / "native" / "mount_trim.c").read_text()
    table = {name: int(sources) for name, _args, sources
             in re.findall(r'\{"(--[a-z0-9-]+)", (\d), (\d)\}', trim)}  # fmt: skip
    assert set(table) == HOST_PATH_OPTIONS | OTHER_BWRAP_OPTIONS, set(table) ^ (
        HOST_PATH_OPTIONS | OTHER_BWRAP_OPTIONS
    )
    assert {name for name, sources in table.items() if sources} == HOST_PATH_OPTIONS
