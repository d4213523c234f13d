"""One real sandbox of the bubblewrap runtime for a test's body, and a shell command in it:
for the runtime tests of files by descriptor and of writes through a pipe."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from aviato.runtime.base import ExecExit, ExecOutput, ExecSpec, SandboxConfig, SandboxHandle
from aviato.runtime.bubblewrap import BubblewrapRuntime, BubblewrapSandbox
from aviato.runtime.supervisor import supervisor_binary

T = TypeVar("T")
MiB = 1 << 20


def run_in_sandbox(
    state_dir: Path,
    body: Callable[[BubblewrapSandbox], Awaitable[T]],
    *,
    layer: str,
    memory: int = 512 * MiB,
    disk: int = 256 * MiB,
) -> T:
    """`body` with a new sandbox (`sleep infinity`) whose writable layer is `layer`, within two
    minutes; every sandbox of the runtime is removed afterwards."""

    async def main() -> T:
        rt = BubblewrapRuntime(state_dir, supervisor=supervisor_binary())
        try:
            sid = "t-" + uuid.uuid4().hex[:12]
            h = await rt.create(SandboxConfig(sandbox_id=sid, image="host",
                                              command=("sleep", "infinity"), env={},
                                              working_dir="", writable_layer=layer,
                                              memory_bytes=memory, disk_bytes=disk))  # fmt: skip
            assert isinstance(h, BubblewrapSandbox)
            return await asyncio.wait_for(body(h), 120)
        finally:
            for sid in rt.list_present():
                await rt.cleanup(sid)
            await rt.close()

    return asyncio.run(main())


async def sh(h: SandboxHandle, script: str) -> str:
    """The output of `sh -c script` in the sandbox, which must exit 0."""
    e = await h.exec(ExecSpec(argv=("sh", "-c", script), timeout_seconds=60))
    out = bytearray()
    async for ev in e.events():
        if isinstance(ev, ExecOutput):
            out.extend(ev.data)
        elif isinstance(ev, ExecExit):
            assert ev.exit_code == 0, out.decode(errors="replace")
    return out.decode(errors="replace")
