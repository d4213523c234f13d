"""`CodeContext`: a Python interpreter that keeps its state between runs, inside a sandbox.

``ctx = sandbox.code_context()`` starts one command in the sandbox, ``python3 -c BOOTSTRAP``,
which reads our driver (`aviato/_interpreter/`, shipped in this package) from its stdin and
runs it; the driver then answers requests on that same command's stdin/stdout (the
framing: `aviato._code_wire`; the driver's docstring says how user code is kept off the
channel). ``ctx.run(code)`` sends one request and gathers the frames of that run into an
`Execution` (`aviato._code_results`). Runs of one context are serialized; contexts are
independent processes, as many per sandbox as you like.

Interrupts are SIGINT to the command's process group (``Process.send_signal``): the driver
turns them into `KeyboardInterrupt` in the user's code, so the interpreter and its state
survive. A run past its ``timeout=`` is interrupted the same way; if it has not stopped
`INTERRUPT_GRACE_SECONDS` later (it caught the interrupt, or sits in a C call that ignores
it), the command is killed and the context is lost: `CodeContextError` from then on.

Everything lives on the SDK's loop (`aviato._bridge`): one async implementation; the methods
return `OperationRef`s (block with ``.result()``, or ``await`` them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

from aviato._bridge import get_bridge
from aviato._code_results import Execution, RichOutput, RunCallbacks, RunCollector
from aviato._code_wire import (
    FrameReader,
    driver_command,
    encode_request,
    new_token,
)
from aviato._operation import OperationRef
from aviato._process import Process
from aviato.exceptions import CodeContextError

__all__ = ["CodeContext", "StartDriver"]

#: Starts the driver's command: (argv, env) → its `Process` (stdin open, output not kept).
StartDriver = Callable[[list[str], dict[str, str]], Process]

DEFAULT_MAX_OUTPUT_BYTES = 4 << 20
DEFAULT_MAX_DISPLAY_BYTES = 16 << 20
MAX_OUTPUT_BYTES = 64 << 20
MAX_DISPLAY_BYTES = 24 << 20
MAX_CODE_BYTES = 16 << 20
START_TIMEOUT_SECONDS = 60.0
INTERRUPT_GRACE_SECONDS = 5.0
CLOSE_TIMEOUT_SECONDS = 5.0
KERNELS = ("auto", "python", "ipython")


def _size(name: str, value: object, default: int, cap: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= cap:
        raise ValueError(f"{name} must be a whole number of bytes from 1 to {cap}, not {value!r}")
    return value


def _timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, not {value!r}")
    return float(value)


class CodeContext:
    """A stateful Python interpreter in a sandbox (see the module docstring and
    docs/code-interpreter.md). Made by `Sandbox.code_context`; starts at once.

    - ``run(code, timeout=None)`` → `OperationRef` of an `Execution` (errors of the code are in
      ``execution.error``, not raised);
    - ``interrupt()`` interrupts the run in progress (``KeyboardInterrupt`` in the code);
    - ``ready()`` → `OperationRef` of the kernel's name once the interpreter is up;
    - ``close()``, or ``with``/``async with``, ends the interpreter (its state is gone).

    Raises `CodeContextError` (from ``run``) when the interpreter could not start or is gone.
    """

    def __init__(
        self,
        start: StartDriver,
        *,
        kernel: str = "auto",
        python: str = "python3",
        env: Mapping[str, str] | None = None,
        max_output_bytes: int | None = None,
        max_display_bytes: int | None = None,
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
        if not isinstance(python, str) or not python:
            raise ValueError(f"python must be the name or path of a Python 3 program: {python!r}")
        self._max_output = _size(
            "max_output_bytes", max_output_bytes, DEFAULT_MAX_OUTPUT_BYTES, MAX_OUTPUT_BYTES
        )
        self._max_display = _size(
            "max_display_bytes", max_display_bytes, DEFAULT_MAX_DISPLAY_BYTES, MAX_DISPLAY_BYTES
        )
        self._kernel_wanted = kernel
        self._env = {"MPLBACKEND": "Agg", **{str(k): str(v) for k, v in (env or {}).items()}}
        self._python = python
        self._token = new_token()
        self._frames = FrameReader(self._token)
        self._process: Process | None = None
        self._kernel: str | None = None
        self._lost: CodeContextError | None = None
        self._closed = False
        self._numbers = itertools.count(1)  # runs are numbered as they are asked for
        self._last_number = 0
        self._interrupt_upto = 0  # interrupt the next run to start if its number is <= this
        self._current: RunCollector | None = None
        self._run_done: asyncio.Future[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._ready: asyncio.Future[str] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._fatal: str | None = None
        self._run_started = False  # the driver said the current run started (signals may go)
        self._interrupt_wanted = False  # interrupt the current run once it has started
        self._interrupt_task: asyncio.Task[None] | None = None
        self._abandoned: int | None = None  # a cancelled run to interrupt when it starts
        self._started = get_bridge().submit(self._start(start))

    # -- the public surface --------------------------------------------------------------------

    @property
    def kernel(self) -> str | None:
        """``"python"`` (our interpreter) or ``"ipython"`` once started; None before."""
        return self._kernel

    @property
    def closed(self) -> bool:
        """True after `close()`, or once the interpreter is gone."""
        return self._closed or self._lost is not None

    def ready(self) -> OperationRef[str]:
        """Completes with the kernel's name once the interpreter answers (raises
        `CodeContextError` if it could not start)."""
        return OperationRef._of(self._wait_started())

    def run(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
        on_output: Callable[[RichOutput], object] | None = None,
    ) -> OperationRef[Execution]:
        """Runs `code` in the context; completes with its `Execution` once it has finished.

        Python source, as in a notebook cell: statements, and a last expression whose value
        becomes ``execution.value``/``.text``. State (variables, imports, functions) stays for
        the next run. `timeout` (seconds from the run's start; default no limit): a run that
        passes it is interrupted, and returns with ``timed_out=True`` and a ``TimeoutError``
        error; the context survives. Runs are serialized: a second ``run`` waits for the first.

        `on_stdout`/`on_stderr` are called with each piece of text as the run writes it, and
        `on_output` with each `RichOutput` as it is shown, live, on the SDK's background thread:
        keep them quick. If one raises, no callback is called again for this run, the run goes
        on to its end, and then its `OperationRef` raises that error.
        """
        for name, callback in (
            ("on_stdout", on_stdout),
            ("on_stderr", on_stderr),
            ("on_output", on_output),
        ):
            if callback is not None and not callable(callback):
                raise TypeError(f"{name} must be a function, not {type(callback).__name__}")
        callbacks = RunCallbacks(on_stdout, on_stderr, on_output)
        if not isinstance(code, str):
            raise TypeError(f"run() takes the code as a str, not {type(code).__name__}")
        try:
            size = len(code.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("the code is not valid text (it holds a lone surrogate)") from None
        if size > MAX_CODE_BYTES:
            raise ValueError(f"the code is {size} bytes, over {MAX_CODE_BYTES >> 20} MiB")
        time_limit = _timeout(timeout)
        number = self._last_number = next(self._numbers)
        request = encode_request({"op": "run", "run": number, "code": code})
        return OperationRef._of(self._run(number, request, time_limit, callbacks))

    def interrupt(self) -> OperationRef[None]:
        """Interrupts the run in progress (or, if it has not started yet, the first run asked for
        before this call): its code gets `KeyboardInterrupt` (as Ctrl-C in a notebook), the run
        returns with that error, and the context keeps its state. Runs queued behind it go on."""
        return OperationRef._of(self._interrupt(self._last_number))

    def close(self) -> OperationRef[None]:
        """Ends the interpreter (its state is gone); idempotent. A run in progress ends with
        `CodeContextError`."""
        return OperationRef._of(self._close(), finish_at_exit=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close().result()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else (self._kernel or "starting")
        return f"<CodeContext {state}>"

    # -- loop-side -----------------------------------------------------------------------------

    async def _start(self, start: StartDriver) -> None:
        loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._ready = loop.create_future()
        argv, source = driver_command(self._python)
        process = start(argv, self._env)
        self._process = process
        self._reader_task = asyncio.create_task(self._read_frames(process))
        assert process.stdin is not None
        hello = {
            "op": "hello",
            "token": self._token.hex(),
            "kernel": self._kernel_wanted,
            "max_output_bytes": self._max_output,
            "max_display_bytes": self._max_display,
        }
        with contextlib.suppress(Exception):  # a failed start is reported by the reader
            await process.stdin.write(source + encode_request(hello))

    async def _wait_started(self) -> str:
        await asyncio.wrap_future(self._started)
        assert self._ready is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT_SECONDS)
        except TimeoutError:
            await self._lose(
                f"the interpreter did not start within {START_TIMEOUT_SECONDS:g} s "
                f"({self._python!r} in the sandbox)"
            )
            raise self._usable_error() from None

    async def _read_frames(self, process: Process) -> None:
        """Reads the driver's frames until its command ends; then the context is lost."""
        reason = "the interpreter exited"
        try:
            async for chunk in process.stdout.iter_bytes():
                for frame, size in self._frames.feed(chunk):
                    self._dispatch(frame, size)
        except Exception as err:
            reason = f"its command failed: {err}"
        if not self._closed:
            code = None
            with contextlib.suppress(BaseException):
                code = (await process).returncode
            if self._fatal is not None:
                reason = f"the interpreter could not start: {self._fatal}"
            elif code is not None and self._kernel is None:
                reason = (
                    f"{self._python!r} could not run the interpreter in the sandbox (exit {code})"
                )
            elif code is not None:
                reason = f"the interpreter exited with code {code}"
                if code == 70:
                    reason += " (code it ran closed or replaced the interpreter's channel)"
        await self._lose(reason)

    def _dispatch(self, frame: dict[str, Any], size: int) -> None:
        kind = frame.get("k")
        if kind == "fatal":
            message = frame.get("message")
            self._fatal = message[:2000] if isinstance(message, str) else "unknown"
            return
        if kind == "ready":
            kernel = frame.get("kernel")
            self._kernel = kernel if kernel in ("python", "ipython") else "python"
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(self._kernel)
            return
        if kind == "start" and frame.get("run") == self._abandoned:
            self._abandoned = None  # its caller cancelled it before it started: stop it now
            self._interrupt_task = asyncio.create_task(self._signal())
        current = self._current
        if current is None or frame.get("run") != current.run:
            return  # an earlier run's (after its timeout) or not ours: ignored
        current.add(frame, size)
        if kind == "start":
            self._run_started = True
            if self._interrupt_wanted:
                self._interrupt_task = asyncio.create_task(self._signal())
        done = self._run_done
        if current.done is not None and done is not None and not done.done():
            done.set_result(None)

    def _usable_error(self) -> CodeContextError:
        if self._lost is not None:
            return self._lost
        return CodeContextError("the code context is closed")

    async def _lose(self, reason: str) -> None:
        if self._lost is None and not self._closed:
            self._lost = CodeContextError(
                f"the code context is gone: {reason}; its state is lost (make a new one)"
            )
        error = self._usable_error()
        for future in (self._ready, self._run_done):
            if future is not None and not future.done():
                future.set_exception(error)
                future.add_done_callback(lambda f: f.exception())
        process = self._process
        if process is not None and not process.done():
            process.cancel()

    async def _run(
        self, number: int, request: bytes, time_limit: float | None, callbacks: RunCallbacks
    ) -> Execution:
        await self._wait_started()
        assert self._lock is not None
        async with self._lock:
            if self.closed:
                raise self._usable_error()
            collector = RunCollector(number, self._max_output, callbacks)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._current, self._run_done = collector, done
            self._run_started = False
            self._interrupt_wanted = number <= self._interrupt_upto
            if self._interrupt_wanted:
                self._interrupt_upto = 0
            timed_out = False
            try:
                try:
                    await self._send(request)
                    await asyncio.wait_for(asyncio.shield(done), time_limit)
                except TimeoutError:
                    timed_out = True
                    await self._interrupt_run()
                    try:
                        await asyncio.wait_for(asyncio.shield(done), INTERRUPT_GRACE_SECONDS)
                    except TimeoutError:
                        await self._lose(
                            f"a run passed its timeout of {time_limit:g} s and did not stop within "
                            f"{INTERRUPT_GRACE_SECONDS:g} s of the interrupt, so it was killed"
                        )
                        raise self._usable_error() from None
                except asyncio.CancelledError:
                    if not self._run_started:
                        self._abandoned = number
                    with contextlib.suppress(Exception):
                        await self._interrupt_run()
                    raise
            finally:
                self._current, self._run_done = None, None
            if collector.callback_error is not None:
                raise collector.callback_error
            return collector.execution(timed_out=timed_out, timeout=time_limit)

    async def _send(self, request: bytes) -> None:
        process = self._process
        assert process is not None and process.stdin is not None
        try:
            await process.stdin.write(request)
        except Exception as err:
            await self._lose(f"its command stopped taking input ({err})")
            raise self._usable_error() from err

    async def _signal(self) -> None:
        process = self._process
        if process is not None and not self.closed:
            await process.send_signal(signal.SIGINT)

    async def _interrupt_run(self) -> None:
        """SIGINT for the current run: now if the driver said it started, else on its "start"
        frame (a signal before the driver read the run would be taken for an earlier run's)."""
        if self._run_started:
            await self._signal()
        else:
            self._interrupt_wanted = True

    async def _interrupt(self, upto: int) -> None:
        """Interrupts the run in progress; with none in progress, the next run to start among
        those asked for before the interrupt (numbers up to `upto`)."""
        await asyncio.wrap_future(self._started)
        if self._current is not None and self._current.run <= upto:
            await self._interrupt_run()
        elif self._current is None:
            self._interrupt_upto = upto

    async def _close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(BaseException):
            await asyncio.wrap_future(self._started)
        self._closed = True
        process = self._process
        error = CodeContextError("the code context was closed")
        for future in (self._ready, self._run_done):
            if future is not None and not future.done():
                future.set_exception(error)
                future.add_done_callback(lambda f: f.exception())
        if process is None or process.done():
            return
        with contextlib.suppress(Exception):
            assert process.stdin is not None
            await process.stdin.write(encode_request({"op": "close"}))
            await process.stdin.close()
        try:
            await asyncio.wait_for(_ended(process), CLOSE_TIMEOUT_SECONDS)
        except TimeoutError:
            process.cancel()


async def _ended(process: Process) -> None:
    """Waits for `process` to end, however it ends."""
    with contextlib.suppress(Exception):
        await process
