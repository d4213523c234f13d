"""The supervisor built against each C library setup.py may use (musl when `musl-gcc` is there,
else glibc) runs sandboxes alike (glibc's launchers forked by the zygote, musl's spawned).

The installed supervisor is built with one of them and the whole suite runs with it; these tests
build the supervisor with each, with setup.py's own `compile_supervisor`, and drive a real
sandbox through everything a C library takes part in: the zygote and the launcher (the runtime
uses the given binary for both), a command with its environment and stdin, output on both
streams, a missing program, a timeout with a process group, a file written and read, and a
restart of the runtime that re-attaches to the sandbox.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
from _system_tools import require_tools

from aviato.runtime.base import ExecExit, ExecOutput, ExecSpec, SandboxConfig, SandboxHandle
from aviato.runtime.bubblewrap import BubblewrapRuntime

ROOT = Path(__file__).resolve().parents[2]


def _setup_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aviato_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its setup() runs only as __main__
    return module


def _compiler(setup: ModuleType, libc: str) -> list[str]:
    if libc == "glibc":
        require_tools("cc")
        return ["cc"]
    require_tools("musl-gcc", "linux-headers")
    headers = setup.kernel_header_dir()
    assert headers is not None, "the kernel's headers are installed but were not found"
    return ["musl-gcc", "-isystem", headers]


async def _run(
    h: SandboxHandle, argv: tuple[str, ...], *, stdin: bytes | None = None, limit: float = 30
) -> tuple[int, bytes, bytes]:
    spec = ExecSpec(argv=argv, env={"WHO": "me"}, stdin=stdin is not None, timeout_seconds=limit)
    execution = await h.exec(spec)
    if stdin is not None:
        await execution.write_stdin(stdin)
        await execution.close_stdin()
    out, err, code = bytearray(), bytearray(), -1
    async for ev in execution.events():
        if isinstance(ev, ExecOutput):
            (out if ev.stream == 1 else err).extend(ev.data)
        elif isinstance(ev, ExecExit):
            code = ev.exit_code
    return code, bytes(out), bytes(err)


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _read(h: SandboxHandle, path: str) -> bytes:
    _, chunks = await h.read_file(path)
    return b"".join([chunk async for chunk in chunks])


@pytest.mark.parametrize("libc", ["glibc", "musl"])
def test_a_supervisor_built_with_each_c_library_runs_sandboxes_alike(
    libc: str, tmp_path: Path
) -> None:
    setup = _setup_module()
    binary = tmp_path / "aviato-supervisor"
    built = setup.compile_supervisor(binary, [_compiler(setup, libc)])
    assert built.startswith("static"), built  # a dynamic one could not start in every image
    version = os.popen(f"{binary} --version").read()
    assert f"protocol 2 ({libc})" in version

    state = tmp_path / "state"

    async def main() -> None:
        rt = BubblewrapRuntime(state, supervisor=binary)
        # glibc's launchers are forked by a zygote (its start is slow), musl's spawned
        assert (rt._launcher.zygote is None) == (libc == "musl")
        sid = "t-" + uuid.uuid4().hex[:12]
        try:
            h = await rt.create(SandboxConfig(sandbox_id=sid, image="host",
                                              command=("sleep", "infinity"), env={},
                                              working_dir=""))  # fmt: skip
            script = 'read line; echo "$WHO $line"; echo e >&2'
            code, out, err = await _run(h, ("sh", "-c", script), stdin=b"fed\n")
            assert (code, out, err) == (0, b"me fed\n", b"e\n")
            code, _, err = await _run(h, ("no-such-program-here",))
            assert code != 0 and b"no-such-program-here" in err
            # a timeout ends the command's whole group, the child it left behind included
            code, _, _ = await _run(h, ("sh", "-c", "sleep 60 & sleep 60"), limit=0.5)
            assert code != 0
            code, out, _ = await _run(h, ("sh", "-c", "pgrep -c sleep || true"))
            assert out.strip() == b"1", "only the main process's sleep remains"
            written = await h.write_file("/tmp/f", 0o644, False, _chunks(b"x" * 100_000))
            assert written == 100_000
            assert await _read(h, "/tmp/f") == b"x" * 100_000
        finally:
            await rt.close()
        # a new runtime (a restarted service) re-attaches to the sandbox the first one left
        rt2 = BubblewrapRuntime(state, supervisor=binary)
        try:
            h2 = await rt2.attach(sid)
            assert isinstance(h2, SandboxHandle), h2
            assert await _read(h2, "/tmp/f") == b"x" * 100_000
        finally:
            for present in rt2.list_present():
                await rt2.cleanup(present)
            await rt2.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_musl_is_preferred_when_there_and_cc_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    setup = _setup_module()
    monkeypatch.setenv("CC", "clang -fsomething")
    assert setup.find_compilers() == [["clang", "-fsomething"]]
    monkeypatch.delenv("CC")
    compilers = setup.find_compilers()
    if shutil.which("musl-gcc") and setup.kernel_header_dir():
        assert Path(compilers[0][0]).name == "musl-gcc"
    assert any(Path(c[0]).name in ("cc", "gcc", "clang") for c in compilers)
