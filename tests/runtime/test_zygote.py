"""The launcher zygote (runtime/bubblewrap/zygote.py, native/zygote.c): launchers are forked
by it, and nothing depends on it. The attacks: the zygote killed between creates, a binary that
has no zygote at all, the runtime closed while its sandboxes run, and what a launcher could
inherit from the zygote or the service."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
import uuid
from pathlib import Path

import pytest
from one_sandbox import sh

from aviato.runtime.bubblewrap import BubblewrapRuntime, BubblewrapSandbox
from aviato.runtime.bubblewrap.launch import LAUNCH_ENV, SIGDEF, launcher_for
from aviato.runtime.bubblewrap.zygote import ANSWER_SECONDS, GIVE_UP_AFTER, Zygote
from aviato.runtime.model import SandboxConfig
from aviato.runtime.supervisor import supervisor_binary


def _config() -> SandboxConfig:
    return SandboxConfig(sandbox_id="t-" + uuid.uuid4().hex[:12], image="host",
                         command=("sleep", "infinity"), env={}, working_dir="")  # fmt: skip


def _parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("PPid:")[1].split()[0])


async def _gone(pid: int, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if _state(pid) in ("Z", "gone"):
            return True
        await asyncio.sleep(0.05)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_launchers_are_forked_by_the_zygote_and_survive_it(tmp_path: Path) -> None:
    async def main() -> None:
        rt = BubblewrapRuntime(tmp_path, supervisor=supervisor_binary())
        rt._launcher = launcher_for(rt._supervisor, zygote=True)  # whatever its C library
        zygote = rt._launcher.zygote
        assert zygote is not None
        # A descriptor the service left inheritable (its caller's pipe, say): the zygote, which
        # lives as long as the service, must not hold it (whoever waits for its end would wait).
        planted_r, planted_w = os.pipe()
        os.set_inheritable(planted_w, True)
        try:
            first = await rt.create(_config())
            assert isinstance(first, BubblewrapSandbox)
            assert zygote.launched == 1 and _parent(first.pid) == zygote.pid
            held = {os.readlink(f"/proc/{zygote.pid}/fd/{fd}")
                    for fd in os.listdir(f"/proc/{zygote.pid}/fd")}  # fmt: skip
            assert os.readlink(f"/proc/self/fd/{planted_w}") not in held, held
            # Nothing of the zygote's or the service's reaches bwrap: descriptors 0-3 only
            # (/dev/null, the runtime log twice, bwrap's own signalfd).
            fds = {int(fd): os.readlink(f"/proc/{first.pid}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{first.pid}/fd")}  # fmt: skip
            assert sorted(fds) == [0, 1, 2, 3], fds
            assert fds[0] == "/dev/null" and fds[1] == fds[2] and fds[1].endswith("runtime.log")
            # The zygote killed: the next create finds it gone and spawns its launcher itself,
            # the one after starts another zygote; the first sandbox runs on.
            old = zygote.pid
            os.kill(old, signal.SIGKILL)
            assert await _gone(old)
            second = await rt.create(_config())
            assert isinstance(second, BubblewrapSandbox)
            assert zygote.pid == 0 and _parent(second.pid) == os.getpid()
            third = await rt.create(_config())
            assert isinstance(third, BubblewrapSandbox)
            assert zygote.pid not in (0, old) and _parent(third.pid) == zygote.pid
            for box, word in ((first, "first"), (second, "second"), (third, "third")):
                assert await sh(box, f"echo {word}") == f"{word}\n"
            # The runtime closed: the zygote ends, its sandboxes keep running.
            last = zygote.pid
            await rt.close()
            assert await _gone(last)
            assert _state(first.pid) not in ("Z", "gone")  # its bwrap runs on
        finally:
            os.close(planted_r)
            os.close(planted_w)
            rt2 = BubblewrapRuntime(tmp_path, supervisor=supervisor_binary())
            try:
                for sid in rt2.list_present():
                    attached = await rt2.attach(sid)
                    assert isinstance(attached, BubblewrapSandbox), attached
                    assert await sh(attached, "echo alive") == "alive\n"
                    await rt2.cleanup(sid)
            finally:
                await rt2.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_binary_without_a_zygote_is_given_up_and_spawning_goes_on(tmp_path: Path) -> None:
    """A supervisor that has no `--zygote` (an older copy): each try answers nothing, the
    launch falls back to a spawn, and after GIVE_UP_AFTER tries no zygote is started again."""
    fake = tmp_path / "no-zygote"
    fake.write_text("#!/bin/sh\nexit 2\n")
    fake.chmod(stat.S_IRWXU)
    zygote = Zygote(str(fake), LAUNCH_ENV, SIGDEF)
    r, w = os.pipe()
    try:
        for _ in range(GIVE_UP_AFTER):
            assert zygote.launch([str(fake), "--launch", "--", "true"], [r, w, r, w, w, r]) is None
            assert zygote.pid == 0  # dropped (and reaped) after its failure
        assert zygote.launch([str(fake), "--launch", "--", "true"], [r, w, r, w, w, r]) is None
        assert zygote.pid == 0 and zygote.launched == 0
    finally:
        os.close(r)
        os.close(w)
        zygote.close()


def test_a_request_the_zygote_refuses_is_spawned_instead(tmp_path: Path) -> None:
    """Too few descriptors: the zygote answers EINVAL and stays; the caller spawns itself."""
    zygote = Zygote(str(supervisor_binary()), LAUNCH_ENV, SIGDEF)
    r, w = os.pipe()
    try:
        assert zygote.launch([str(supervisor_binary()), "--launch", "--", "true"], [r, w]) is None
        running = zygote.pid
        assert running and _state(running) not in ("Z", "gone")
        assert zygote.launched == 0
    finally:
        os.close(r)
        os.close(w)
        zygote.close()


def test_a_zygote_that_takes_a_request_and_hangs_fails_the_launch_in_time() -> None:
    """Once a request reached the zygote a launcher may exist, so the launch must not be
    spawned a second time: a stopped zygote fails it within ANSWER_SECONDS, is killed, and the
    next launch starts another."""
    supervisor = str(supervisor_binary())
    zygote = Zygote(supervisor, LAUNCH_ENV, SIGDEF)
    null = os.open("/dev/null", os.O_RDWR)
    argv = [supervisor, "--launch", "--", "/bin/true"]
    try:
        first = zygote.launch(argv, [null] * 6)
        assert first is not None
        os.close(first[1])
        hung = zygote.pid
        os.kill(hung, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(OSError, match="did not answer"):
            zygote.launch(argv, [null] * 6)
        assert time.monotonic() - t0 < ANSWER_SECONDS + 1
        assert zygote.pid == 0 and _state(hung) == "gone"  # killed and reaped
        again = zygote.launch(argv, [null] * 6)
        assert again is not None and zygote.pid not in (0, hung)
        os.close(again[1])
    finally:
        os.close(null)
        zygote.close()
