"""OCI images on a real BubblewrapRuntime: config honoured, roots shared, exec works."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from oci_helpers import LOCAL, Entry, Pusher, Registry, busybox_layer

from aviato.images.errors import ImageError
from aviato.runtime.base import (
    ExecExit,
    ExecFailed,
    ExecOutput,
    ExecSpec,
    SandboxConfig,
    SandboxHandle,
)
from aviato.runtime.bubblewrap import BubblewrapRuntime

T = TypeVar("T")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run sandboxes as root")


def run_with(state: Path, body: Callable[[BubblewrapRuntime], Awaitable[T]]) -> T:
    async def main() -> T:
        rt = BubblewrapRuntime(state, insecure_registries=LOCAL)
        try:
            return await asyncio.wait_for(body(rt), 120)
        finally:
            for sid in rt.list_present():
                await rt.cleanup(sid)
            await rt.close()

    return asyncio.run(main())


def config(sid: str, image: str, *command: str, **kw: Any) -> SandboxConfig:
    env = kw.pop("env", {})
    workdir = kw.pop("working_dir", "")
    return SandboxConfig(
        sandbox_id=sid, image=image, command=tuple(command), env=env, working_dir=workdir, **kw
    )


async def sh(h: SandboxHandle, script: str) -> tuple[int, str, str]:
    e = await h.exec(ExecSpec(argv=("sh", "-c", script), timeout_seconds=30))
    out, err = bytearray(), bytearray()
    code = -1
    async for ev in e.events():
        if isinstance(ev, ExecOutput):
            (out if ev.stream == 1 else err).extend(ev.data)
        elif isinstance(ev, ExecExit):
            code = ev.exit_code
        elif isinstance(ev, ExecFailed):
            raise AssertionError(f"exec failed: {ev}")
    return code, out.decode(), err.decode()


def test_pull_and_exec_with_config_honoured(
    registry: Registry, pusher: Pusher, workdir: Path
) -> None:
    cmd = ["sh", "-c", "echo from-cmd; exit 3"]
    env = ["PATH=/bin", "GREETING=hello"]
    pusher.image("t/app", "v1", [busybox_layer()], env=env, working_dir="/app", user="app", cmd=cmd)
    ref = f"{registry.host}/t/app:v1"

    async def body(rt: BubblewrapRuntime) -> None:
        assert not rt.image_ready(ref)
        h = await rt.create(config("img-a", ref, env={"EXTRA": "1"}))
        assert rt.image_ready(ref)
        code, out, _ = await sh(h, "id -u; id -g; pwd; echo $GREETING $EXTRA $HOME; "
                                   "touch /app/x 2>&1; echo w > /workspace/f && cat /workspace/f; "
                                   "echo t > /tmp/t && cat /tmp/t; hostname 2>/dev/null; "
                                   "cat /proc/1/cmdline | head -c 40")  # fmt: skip
        lines = out.splitlines()
        assert code == 0, out
        assert lines[:4] == ["1000", "1000", "/app", "hello 1 /home/app"]
        assert "Read-only file system" in lines[4]
        assert lines[5:7] == ["w", "t"]
        await h.kill()
        # A mounted file is the image user's to read, and what it writes is its own.
        mounted = await rt.create(
            config("img-m", ref, mounted_files=(("/workspace/cfg.txt", b"conf"),))
        )
        code, out, err = await sh(
            mounted, "cat /workspace/cfg.txt; echo; touch /workspace/new; stat -c %u /workspace/new"
        )
        assert (code, out.split()) == (0, ["conf", "1000"]), err
        await mounted.kill()
        # With image_command and no command: the image's Cmd is the main process.
        main = await rt.create(config("img-b", ref, image_command=True))
        exit = await main.wait_exit()
        assert exit.exit_code == 3
        assert b"from-cmd" in main.log_path.read_bytes()

    run_with(workdir / "state", body)


def test_entrypoint_plus_cmd_and_numeric_user(
    registry: Registry, pusher: Pusher, workdir: Path
) -> None:
    pusher.image("t/ep", "v1", [busybox_layer()], user="4242:50",
                 entrypoint=["sh", "-c"], cmd=["id -u; id -g; exit 7"])  # fmt: skip
    ref = f"{registry.host}/t/ep:v1"

    async def body(rt: BubblewrapRuntime) -> None:
        h = await rt.create(config("ep-a", ref, image_command=True))
        exit = await h.wait_exit()
        assert exit.exit_code == 7
        assert b"4242" in h.log_path.read_bytes() and b"50" in h.log_path.read_bytes()

    run_with(workdir / "state", body)


def test_two_sandboxes_share_one_root(registry: Registry, pusher: Pusher, workdir: Path) -> None:
    pusher.image("t/bb", "v1", [busybox_layer()])
    ref = f"{registry.host}/t/bb:v1"

    async def body(rt: BubblewrapRuntime) -> None:
        a, b = await asyncio.gather(rt.create(config("sh-a", ref)), rt.create(config("sh-b", ref)))
        stored = rt.image_store.find(ref)
        assert stored is not None
        host_ino = os.stat(stored.rootfs / "bin/busybox").st_ino
        _, ino_a, _ = await sh(a, "stat -c %i /bin/busybox; echo a > /workspace/mine")
        _, ino_b, _ = await sh(b, "stat -c %i /bin/busybox; ls /workspace")
        assert int(ino_a) == int(ino_b.splitlines()[0]) == host_ino
        assert ino_b.splitlines()[1:] == []  # each sandbox has its own writable layer
        assert rt.image_store.unpacks == 1 and len(rt.image_store.list_images()) == 1
        # In use: neither prune nor remove touches it while they run.
        assert rt.image_store.prune() == []
        with pytest.raises(ImageError):
            rt.image_store.remove(ref)
        await a.kill()
        await b.kill()
        await rt.cleanup("sh-a")
        await rt.cleanup("sh-b")
        assert [i.digest for i in rt.image_store.prune()] == [stored.digest]
        assert not stored.rootfs.exists()

    run_with(workdir / "state", body)


def test_ten_concurrent_creates_pull_once(
    registry: Registry, pusher: Pusher, workdir: Path
) -> None:
    pushed = pusher.image("t/bb", "v1", [busybox_layer([Entry("marker", data=b"m")])])
    ref = f"{registry.host}/t/bb:v1"

    async def body(rt: BubblewrapRuntime) -> None:
        handles = await asyncio.gather(*(rt.create(config(f"c-{i}", ref)) for i in range(10)))
        outs = await asyncio.gather(*(sh(h, "cat /marker") for h in handles))
        assert [o[1] for o in outs] == ["m"] * 10
        assert rt.image_store.blob_downloads == 1 and rt.image_store.unpacks == 1

    run_with(workdir / "state", body)
    assert registry.blob_gets(pushed.layers[0]) == 1


def test_unknown_user_fails_create_clearly(
    registry: Registry, pusher: Pusher, workdir: Path
) -> None:
    pusher.image("t/nouser", "v1", [busybox_layer()], user="ghost")
    ref = f"{registry.host}/t/nouser:v1"

    async def body(rt: BubblewrapRuntime) -> None:
        with pytest.raises(ImageError, match=r"ghost.*passwd"):
            await rt.create(config("nu-a", ref))

    run_with(workdir / "state", body)


def test_prune_spares_images_of_sandboxes_reattached_after_restart(
    registry: Registry, pusher: Pusher, workdir: Path
) -> None:
    pushed = pusher.image("t/bb", "v1", [busybox_layer()])
    ref = f"{registry.host}/t/bb:v1"
    state = workdir / "state"

    async def first() -> None:
        rt = BubblewrapRuntime(state, insecure_registries=LOCAL)
        await rt.create(config("rs-a", ref))
        await rt.close()  # the service goes away; the sandbox keeps running

    async def second() -> None:
        rt = BubblewrapRuntime(state, insecure_registries=LOCAL)
        try:
            handle = await rt.attach("rs-a")
            assert isinstance(handle, SandboxHandle)
            assert rt.image_store.prune() == []
            code, out, _ = await sh(handle, "cat /etc/group | head -1")
            assert (code, out) == (0, "root:x:0:\n")
            await rt.cleanup("rs-a")
            assert [i.digest for i in rt.image_store.prune()] == [pushed.digest]
        finally:
            for sid in rt.list_present():
                await rt.cleanup(sid)
            await rt.close()

    asyncio.run(first())
    asyncio.run(second())
