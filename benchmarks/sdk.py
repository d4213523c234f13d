"""aviato, measured as a user meets it: the public SDK (`from aviato import Sandbox`) and the
embedded local service.

`AVIATO_STATE_DIR` points at a fresh short directory, where the first SDK call would autostart
a dedicated `python -m aviato.server`; its default `--max-sandboxes` (1000) leaves no room
above the burst of 1,000, so this module starts that service itself with a higher bound (the
autostart's command line plus `--max-sandboxes`), and the SDK finds it there. `close()` stops
every sandbox still running, then the service (SIGTERM to the pid in `server.pid`), and
removes the directory.

The sync scenarios use the sync API (`Sandbox.run()`, `.exec(...).result()`); the async ones
await the same handles from the benchmark's own event loop, as an async training loop would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._stats import children_of, rss_bytes
from benchmarks._system import DEFAULT_TIMEOUT, ExecOut, Skip, System

MIN_MAX_SANDBOXES = 1100  # the burst figure's 1,000 and a margin
IDLE_START_WAVE = 100  # sandboxes started at once by start_idle
READ_MAX_BYTES = 1 << 30  # the files figure reads 100 MiB, past read_file's default (64 MiB)


def _pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (reaps it if it is our child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class AviatoSystem(System):
    name = "aviato"
    label = "aviato"

    def __init__(self, base_url: str = "") -> None:
        """`base_url`: measure that service (e.g. on a cluster) instead of a local one."""
        self.base_url = base_url
        self.state_dir = ""
        self._server_pid: int | None = None
        self._info: dict[str, Any] = {}

    # -- service -------------------------------------------------------------------------------

    def start(self) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="avb", dir="/tmp")
        os.environ["AVIATO_STATE_DIR"] = self.state_dir
        for var in ("AVIATO_BASE_URL", "AVIATO_API_KEY"):
            os.environ.pop(var, None)
        if self.base_url:
            os.environ["AVIATO_BASE_URL"] = self.base_url
        try:
            import aviato
            from aviato import Sandbox
        except ImportError as exc:
            raise Skip(f"the aviato SDK is not importable: {exc}") from exc
        if not self.base_url:
            self._maybe_start_service()
        t0 = time.perf_counter()
        try:
            sandbox = Sandbox.run()
            out = sandbox.exec(["true"]).result(timeout=DEFAULT_TIMEOUT)
            sandbox.stop().result(timeout=DEFAULT_TIMEOUT)
        except Exception as exc:
            raise Skip(f"aviato does not work here: {type(exc).__name__}: {exc}") from exc
        if out.returncode != 0:
            raise Skip(f"aviato: `true` exited {out.returncode}: {out.stderr[-300:]}")
        self._server_pid = self._read_pid()
        self._info = {
            "version": aviato.__version__,
            "state_dir": self.state_dir,
            "service_pid": self._server_pid,
            "first_use_seconds": round(time.perf_counter() - t0, 3),
        }
        self._info.update(self._server_info())

    def _maybe_start_service(self) -> None:
        """Starts the service with a higher sandbox cap if its default is below
        MIN_MAX_SANDBOXES."""
        try:
            from aviato.server.config import DEFAULT_MAX_SANDBOXES
        except ImportError:
            return
        if DEFAULT_MAX_SANDBOXES == 0 or DEFAULT_MAX_SANDBOXES >= MIN_MAX_SANDBOXES:
            return  # the SDK's autostart will do
        import subprocess
        import sys

        log = open(Path(self.state_dir) / "server.log", "ab")  # noqa: SIM115 - handed over
        subprocess.Popen(
            [sys.executable, "-m", "aviato.server", "--state-dir", self.state_dir,
             "--max-sandboxes", str(MIN_MAX_SANDBOXES)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while not (Path(self.state_dir) / "aviato.sock").exists():
            if time.monotonic() > deadline:
                raise Skip("the aviato service did not start within 30 s")
            time.sleep(0.05)

    def _read_pid(self) -> int | None:
        try:
            return int((Path(self.state_dir) / "server.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _server_info(self) -> dict[str, Any]:
        try:
            from aviato._bridge import get_bridge
            from aviato._client import get_client  # the SDK's own channel

            async def info() -> Any:
                client = await get_client(None)
                return await client.transport.server_info(call_timeout=10)

            got = get_bridge().run(info(), timeout=15)
            return {"runtime": str(got.runtime), "cgroups": str(got.cgroups)}
        except Exception as exc:  # informational only
            return {"server_info_error": str(exc)[:200]}

    def service_rss(self) -> int | None:
        return rss_bytes(self._server_pid) if self._server_pid else None

    def describe(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        if not self.state_dir:
            return
        with contextlib.suppress(Exception):
            from aviato import Sandbox

            left = Sandbox.list().result(timeout=60)
            refs = [sb.stop(graceful_shutdown_seconds=0) for sb in left]
            for ref in refs:
                with contextlib.suppress(Exception):
                    ref.result(timeout=60)
        pid = self._server_pid or self._read_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- sync ----------------------------------------------------------------------------------

    def create(self) -> Any:
        from aviato import Sandbox

        return Sandbox.run()

    def exec(self, box: Any, argv: Sequence[str], stdin: bytes | None = None) -> ExecOut:
        result = box.exec(list(argv), input=stdin).result(timeout=DEFAULT_TIMEOUT)
        return ExecOut(result.returncode, result.stdout_bytes, result.stderr_bytes)

    def write_file(self, box: Any, path: str, data: bytes) -> None:
        box.write_file(path, data).result(timeout=DEFAULT_TIMEOUT)

    def read_file(self, box: Any, path: str) -> bytes:
        data: bytes = box.read_file(path, max_bytes=READ_MAX_BYTES).result(timeout=DEFAULT_TIMEOUT)
        return data

    def stop(self, box: Any) -> None:
        box.stop().result(timeout=DEFAULT_TIMEOUT)

    # -- async ---------------------------------------------------------------------------------

    async def acreate(self) -> Any:
        from aviato import Sandbox

        sandbox = Sandbox()
        await sandbox.start()
        return sandbox

    async def aexec(self, box: Any, argv: Sequence[str], stdin: bytes | None = None) -> ExecOut:
        result = await box.exec(list(argv), input=stdin)
        return ExecOut(result.returncode, result.stdout_bytes, result.stderr_bytes)

    async def astop(self, box: Any) -> None:
        await box.stop()

    # -- density -------------------------------------------------------------------------------

    def start_idle(self, n: int, deadline_s: float) -> tuple[list[Any], int]:
        """Waves of `Sandbox()`s started together (`aviato.wait` starts them, waits RUNNING)."""
        import aviato
        from aviato import Sandbox

        boxes: list[Any] = []
        errors = 0
        end = time.monotonic() + deadline_s
        while len(boxes) + errors < n and time.monotonic() < end:
            wave = [Sandbox() for _ in range(min(IDLE_START_WAVE, n - len(boxes) - errors))]
            _, pending = aviato.wait(wave, timeout=max(1.0, end - time.monotonic()))
            for sandbox in wave:
                if sandbox in pending or sandbox.status is None or not sandbox.status.is_running:
                    errors += 1
                    with contextlib.suppress(Exception):
                        sandbox.stop(graceful_shutdown_seconds=0).result(timeout=60)
                else:
                    boxes.append(sandbox)
        return boxes, errors

    def idle_pids(self, boxes: list[Any]) -> list[int]:
        """The service's children: one `bwrap` (with the supervisor below it) per sandbox."""
        return children_of(self._server_pid) if self._server_pid else []

    def stop_idle(self, boxes: list[Any]) -> int:
        """`stop()` on every sandbox at once (non-blocking), then collect them all."""
        refs = [sandbox.stop() for sandbox in boxes]
        errors = 0
        for ref in refs:
            try:
                ref.result(timeout=DEFAULT_TIMEOUT)
            except Exception:
                errors += 1
        return errors
