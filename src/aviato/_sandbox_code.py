"""`Sandbox.code_context()`: a stateful Python interpreter (docs/code-interpreter.md).

The context's client side is `aviato._code_context`; this mixin only starts its interpreter,
as a command of the sandbox that, unlike other commands, ends with this client's connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aviato._bridge import get_bridge
from aviato._code_context import CodeContext
from aviato._process import ExecState, Process
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["SandboxCodeContexts"]


class SandboxCodeContexts:
    """`code_context`; `SandboxIO` provides `_exec`."""

    async def _exec(self, state: ExecState, init: pb.ExecInit, check: bool) -> Any:
        raise NotImplementedError

    def code_context(
        self,
        language: str = "python",
        *,
        kernel: str = "auto",
        python: str = "python3",
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        max_output_bytes: int | None = None,
        max_display_bytes: int | None = None,
    ) -> CodeContext:
        """A Python interpreter in the sandbox that keeps its state between runs, as a notebook's
        kernel does: ``ctx.run("x = 1")``, then ``ctx.run("x + 1").result().value == 2``.

        Returns a `CodeContext` at once; it starts in the background (the sandbox is started
        if needed). Needs only `python` (3.8 or later) in the sandbox: our driver is sent over
        the command's stdin. `kernel`: ``"auto"`` uses IPython when the sandbox's Python has it
        (magics, ``!cmd``, IPython's display system), else our own interpreter;
        ``"python"``/``"ipython"`` choose. `cwd` and `env` as for `exec`. Per run, each of
        stdout and stderr keeps at most `max_output_bytes` (default 4 MiB, at most 64 MiB),
        and each rich output format at most `max_display_bytes` (default 16 MiB, at most
        24 MiB). Several contexts per sandbox are independent. See docs/code-interpreter.md.
        """
        if language not in ("python", "python3"):
            raise ValueError(f"code_context() supports language='python', not {language!r}")
        if cwd is not None and not cwd.startswith("/"):
            raise ValueError(f"cwd must be an absolute path: {cwd!r}")

        def start(argv: list[str], driver_env: dict[str, str]) -> Process:
            # Without a request id: unlike a command, the interpreter ends with this client's
            # connection (a context cannot be re-attached, so one left behind would only hold
            # memory until the sandbox ends).
            state = ExecState(argv, stdin=True, tty=False, max_output_bytes=0)
            init = pb.ExecInit(argv=argv, cwd=cwd or "", env=driver_env, stdin=True)
            return Process(get_bridge().submit(self._exec(state, init, False)), state)

        return CodeContext(
            start,
            kernel=kernel,
            python=python,
            env=env,
            max_output_bytes=max_output_bytes,
            max_display_bytes=max_display_bytes,
        )
