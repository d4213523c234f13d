"""The driver's kernels: `PlainKernel` (Python's own `exec`, REPL-like) and `IPythonKernel`
(IPython's InteractiveShell with our display hook and publisher), and `RunState`, what the
driver's threads share about the run in progress. Python 3.8 or later.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import importlib
import inspect
import linecache
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .rich import (
    DRIVER_FILES,
    MAX_TEXT_CHARS,
    add_formats,
    bounded_repr,
    figure_png,
    mime_bundle,
    user_traceback,
)

if TYPE_CHECKING:  # the driver runs on Python 3.8, where dict[...] cannot be evaluated
    Display = Callable[[dict[str, Any]], None]


class RunState:
    """The run in progress (None between runs), shared by the main thread and the readers."""

    def __init__(self, max_output_bytes: int, max_display_bytes: int) -> None:
        self.run: int | None = None
        self.max_output_bytes = max_output_bytes
        self.max_display_bytes = max_display_bytes
        self.busy = False  # user code is running: SIGINT raises KeyboardInterrupt
        self.pending_interrupt = False  # SIGINT came before the user code started

    def interrupted(self) -> None:
        """The SIGINT handler: interrupts user code, or keeps the interrupt for the code about
        to start. The SDK signals a run only after its "start" frame, and sends the next request
        only after the run's "done" frame and after any signal for it, so when `Driver` reads a
        request every interrupt meant for an earlier run has been seen: it forgets them then."""
        if self.busy:
            raise KeyboardInterrupt
        self.pending_interrupt = True

    def enter_user_code(self) -> None:
        self.busy = True
        if self.pending_interrupt:
            self.pending_interrupt = False
            raise KeyboardInterrupt
        self.displays = 0
        self.dropped: list[str] = []


class Outcome:
    def __init__(self) -> None:
        self.has_value = False
        self.value: Any = None
        self.bundle: dict[str, Any] | None = None
        self.error: tuple[BaseException, str] | None = None
        self.count = 0


class PlainKernel:
    """Python's own `exec`, REPL-like: the last expression statement is the run's value."""

    name = "python"

    def __init__(self, state: RunState, display: Display) -> None:
        self.state = state
        self.module = types.ModuleType("__main__")
        self.module.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = self.module
        self.count = 0
        self.loop = asyncio.new_event_loop()

        def display_(*values: Any) -> None:
            """Shows each value as a rich output of the current run."""
            for value in values:
                display(mime_bundle(value, state.max_display_bytes, state.dropped))

        builtins.display = display_  # type: ignore[attr-defined]

    def _evaluate(self, code: Any) -> Any:
        result = eval(code, self.module.__dict__)
        if code.co_flags & inspect.CO_COROUTINE:
            result = self.loop.run_until_complete(result)
        return result

    def run(self, source: str) -> Outcome:
        self.count += 1
        outcome = Outcome()
        outcome.count = self.count
        filename = f"<cell-{self.count}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        flags = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
        try:
            self.state.enter_user_code()
            try:
                tree = ast.parse(source, filename, "exec")
                last = (
                    tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
                )
                self._evaluate(compile(tree, filename, "exec", flags=flags))
                if isinstance(last, ast.Expr):
                    expression = ast.Expression(last.value)
                    value = self._evaluate(compile(expression, filename, "eval", flags=flags))
                    if value is not None:
                        outcome.has_value, outcome.value = True, value
                        self.module.__dict__["_"] = value
            finally:
                self.state.busy = False
        except BaseException as err:
            self.state.busy = False
            outcome.error = (err, user_traceback(err))
        return outcome


class IPythonKernel:
    """IPython's InteractiveShell: magics, ``!cmd``, top-level await and IPython's display
    system, with its display publisher and display hook replaced by ours."""

    name = "ipython"

    def __init__(self, state: RunState, display: Display) -> None:
        shell_module = importlib.import_module("IPython.core.interactiveshell")
        hook_module = importlib.import_module("IPython.core.displayhook")
        publisher_module = importlib.import_module("IPython.core.displaypub")
        config = importlib.import_module("traitlets.config").Config()
        config.HistoryManager.enabled = False  # no SQLite file in the sandbox's home
        kernel = self
        self.state = state
        self.outcome = Outcome()

        class Publisher(publisher_module.DisplayPublisher):  # type: ignore[misc, name-defined]
            def publish(self, data: Any, metadata: Any = None, *args: Any, **kwargs: Any) -> None:
                if isinstance(data, dict):
                    found = {k: v for k, v in data.items() if k != "text/plain"}
                    plain = bounded_repr(data.get("text/plain", ""))
                    if isinstance(data.get("text/plain"), str):
                        plain = data["text/plain"][:MAX_TEXT_CHARS]
                    bundle = add_formats(
                        {"text/plain": plain}, found, state.max_display_bytes, state.dropped
                    )
                    display(bundle)

            def clear_output(self, wait: bool = False) -> None:
                pass

        class Hook(hook_module.DisplayHook):  # type: ignore[misc, name-defined]
            def __call__(self, result: Any = None) -> None:
                self.check_for_underscore()
                if result is None or self.quiet():
                    return
                format_dict, _ = self.compute_format_data(result)
                self.update_user_ns(result)
                self.fill_exec_result(result)
                found = dict(format_dict or {})
                found.pop("text/plain", None)
                png = figure_png(result)
                if png is not None:
                    found["image/png"] = png
                plain = {"text/plain": bounded_repr(result)}
                bundle = add_formats(plain, found, state.max_display_bytes, state.dropped)
                kernel.outcome.has_value = True
                kernel.outcome.value = result
                kernel.outcome.bundle = bundle

        shell_class = shell_module.InteractiveShell
        self.shell = shell_class.instance(
            config=config, displayhook_class=Hook, display_pub_class=Publisher
        )
        # as `%matplotlib inline` does: a figure shown by IPython's display() is a PNG too
        png_formatter = self.shell.display_formatter.formatters["image/png"]
        png_formatter.for_type_by_name("matplotlib.figure", "Figure", figure_png)
        for scheme in ("nocolor", "NoColor"):
            try:
                self.shell.colors = scheme
                break
            except Exception:
                continue

        def show_traceback(etype: Any, evalue: Any, stb: Any) -> None:
            # one entry per frame: the driver's (the SIGINT handler's) are left out
            entries = stb if isinstance(stb, list) else [str(stb)]
            text = "\n".join(str(e) for e in entries if DRIVER_FILES not in str(e))
            if isinstance(evalue, BaseException):
                kernel.outcome.error = (evalue, text)

        self.shell._showtraceback = show_traceback

    def run(self, source: str) -> Outcome:
        self.outcome = outcome = Outcome()
        try:
            self.state.enter_user_code()
            try:
                result = self.shell.run_cell(source, store_history=True)
            finally:
                self.state.busy = False
            outcome.count = int(getattr(result, "execution_count", 0) or 0)
            failure = result.error_before_exec or result.error_in_exec
            if failure is not None and outcome.error is None:
                outcome.error = (failure, user_traceback(failure))
        except BaseException as err:
            self.state.busy = False
            outcome.error = (err, user_traceback(err))
        return outcome


def make_kernel(wanted: str, state: RunState, display: Display) -> Any:
    if wanted in ("auto", "ipython"):
        try:
            return IPythonKernel(state, display)
        except Exception:  # absent, or an install that does not import: ours serves "auto"
            if wanted == "ipython":
                raise
    return PlainKernel(state, display)
