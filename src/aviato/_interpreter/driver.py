"""The driver of a code context, run inside the sandbox by ``python3`` (3.8 or later).

It is not imported by the SDK: `aviato._code_wire` sends this file's text over the command's
stdin and the bootstrap line executes it. It imports the standard library only (and IPython
when asked for and present): nothing of `aviato` exists in the sandbox.

The channel. At start the driver moves the command's stdin and stdout (the pipes to the SDK)
to descriptors above 100, close-on-exec, and puts ``/dev/null`` on fd 0 and pipes of its own on
fds 1 and 2, read by two threads. Whatever the user's code (or a program it starts) writes to
fd 1 or 2 is therefore data, carried inside frames, never a frame itself. The SDK's requests
arrive as a 4-byte big-endian length and a JSON object. The driver's frames are::

    b"\\xffAVZ" + token (16 random bytes the SDK chose) + 4-byte big-endian length + JSON

with the JSON encoded as ASCII, so the marker (which holds 0xFF) never occurs inside a genuine
frame; the SDK skips any bytes that are not a frame with its token (see `aviato._code_wire`).
The driver checks before each frame that its descriptors are still the ones it opened, and
exits if the user's code closed or replaced them (the SDK then reports the context as lost).

What this cannot do: the user's code runs in this very process, so code that sets out to read
the token from the driver's memory can write frames the SDK accepts, for its own runs. That
gains it nothing it could not print as its result; the SDK parses every frame with bounds and
as JSON (never pickle), so the worst it gets is a wrong answer from the sandbox it controls.

Interrupts: the SDK sends SIGINT; the handler raises `KeyboardInterrupt` only while user code
runs, so the driver itself is never interrupted between runs.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import builtins
import codecs
import contextlib
import fcntl
import importlib
import inspect
import io
import json
import linecache
import os
import re
import select
import signal
import struct
import sys
import termios
import threading
import time
import traceback
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

MAGIC = b"\xffAVZ"
FRAME_HEADER = struct.Struct(">4s16sI")
REQUEST_HEADER = struct.Struct(">I")
MAX_REQUEST_BYTES = 64 << 20
MAX_FRAME_BYTES = 32 << 20
CHANNEL_FD_FLOOR = 100
OUTPUT_CHUNK_BYTES = 64 << 10
MAX_TEXT_CHARS = 1 << 20
MAX_ERROR_VALUE_CHARS = 64 << 10
MAX_TRACEBACK_LINES = 200
MAX_TRACEBACK_LINE_CHARS = 4096
MAX_PLAIN_DATA_BYTES = 1 << 20
MAX_PLAIN_DATA_ITEMS = 100_000
MAX_PLAIN_DATA_DEPTH = 32
MAX_DISPLAYS_PER_RUN = 256
SETTLE_SECONDS = 2.0
EX_CHANNEL_LOST = 70

REPR_METHODS = (
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("image/svg+xml", "_repr_svg_"),
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
)
KNOWN_MIMES = frozenset(["text/plain"] + [mime for mime, _ in REPR_METHODS])
BINARY_MIMES = frozenset(["image/png", "image/jpeg"])
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
THIS_FILE = (lambda: 0).__code__.co_filename


def _high_dup(fd: int) -> int:
    """A close-on-exec duplicate of `fd` at or above CHANNEL_FD_FLOOR."""
    return fcntl.fcntl(fd, getattr(fcntl, "F_DUPFD_CLOEXEC", 1030), CHANNEL_FD_FLOOR)


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _pending_bytes(fd: int) -> int:
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def _lost(reason: str) -> None:
    """Ends the driver: its channel is gone, so nothing more can be said to the SDK."""
    os._exit(EX_CHANNEL_LOST)


class Channel:
    """The frames to the SDK and the requests from it (see the module docstring)."""

    def __init__(self, fd_in: int, fd_out: int) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.token = b""
        self.lock = threading.RLock()
        self.sent_in_run = 0
        self.watched: dict[int, tuple[int, int]] = {}
        self.watch(fd_in)
        self.watch(fd_out)

    def watch(self, fd: int) -> None:
        self.watched[fd] = _identity(fd)

    def verify(self) -> None:
        """Exits if a descriptor of the driver was closed or replaced by the user's code."""
        try:
            for fd, identity in self.watched.items():
                if _identity(fd) != identity:
                    _lost(f"descriptor {fd} was replaced")
        except OSError:
            _lost("a descriptor was closed")

    def send(self, message: dict[str, Any]) -> None:
        payload = json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        data = payload.encode("ascii")
        if len(data) > MAX_FRAME_BYTES:
            raise ValueError("frame too large")
        frame = FRAME_HEADER.pack(MAGIC, self.token, len(data)) + data
        with self.lock:
            self.verify()
            view = memoryview(frame)
            try:
                while view:
                    view = view[os.write(self.fd_out, view) :]
            except OSError:
                _lost("the channel is closed")
            if message.get("k") != "done":
                self.sent_in_run += 1

    def _read_exactly(self, n: int) -> bytes | None:
        parts = []
        while n:
            try:
                chunk = os.read(self.fd_in, min(n, 1 << 20))
            except OSError:
                return None
            if not chunk:
                return None
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def read_request(self) -> dict[str, Any] | None:
        """The next request, or None when the SDK closed the channel."""
        head = self._read_exactly(REQUEST_HEADER.size)
        if head is None:
            return None
        (size,) = REQUEST_HEADER.unpack(head)
        if size > MAX_REQUEST_BYTES:
            return None
        body = self._read_exactly(size)
        if body is None:
            return None
        request = json.loads(body.decode("utf-8"))
        return request if isinstance(request, dict) else None


class RunState:
    """The run in progress (None between runs), shared by the main thread and the readers."""

    def __init__(self, max_output_bytes: int, max_display_bytes: int) -> None:
        self.run: int | None = None
        self.max_output_bytes = max_output_bytes
        self.max_display_bytes = max_display_bytes
        self.busy = False  # user code is running: SIGINT raises KeyboardInterrupt
        self.displays = 0
        self.dropped: list[str] = []


class Capture:
    """fds 1 and 2 as pipes, read by one thread each into "out" frames of the current run."""

    NAMES = ("stdout", "stderr")

    def __init__(self, channel: Channel, state: RunState) -> None:
        self.channel = channel
        self.state = state
        self.read_ends: list[int] = []
        self.write_ends: list[int] = []
        self.totals = [0, 0]
        self.decoders = [self._decoder(), self._decoder()]
        for _ in range(2):
            read_end, write_end = os.pipe()
            self.read_ends.append(_high_dup(read_end))
            self.write_ends.append(_high_dup(write_end))
            os.close(read_end)
            os.close(write_end)
            channel.watch(self.read_ends[-1])
            channel.watch(self.write_ends[-1])
        self.restore()
        for index in (0, 1):
            threading.Thread(target=self._pump, args=(index,), daemon=True).start()

    @staticmethod
    def _decoder() -> codecs.IncrementalDecoder:
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    def restore(self) -> None:
        """Puts the capture pipes back on fds 1 and 2 (user code may have closed them)."""
        for index, write_end in enumerate(self.write_ends):
            os.dup2(write_end, index + 1, inheritable=True)

    def begin(self) -> None:
        self.totals = [0, 0]
        self.decoders = [self._decoder(), self._decoder()]

    def _pump(self, index: int) -> None:
        fd = self.read_ends[index]
        while True:
            try:
                select.select([fd], [], [])
                with self.channel.lock:
                    self.channel.verify()
                    data = os.read(fd, OUTPUT_CHUNK_BYTES)
                    if data:
                        self._forward(index, data)
            except OSError:
                _lost("a capture pipe was closed")

    def _forward(self, index: int, data: bytes) -> None:
        """Called with the channel's lock held."""
        run = self.state.run
        if run is None:
            return  # written between runs (a background writer): dropped
        kept = max(0, min(len(data), self.state.max_output_bytes - self.totals[index]))
        self.totals[index] += len(data)
        if kept:
            text = self.decoders[index].decode(data[:kept])
            if text:
                self.channel.send({"k": "out", "run": run, "name": self.NAMES[index], "text": text})

    def settle(self) -> None:
        """Waits (at most SETTLE_SECONDS) until what the run wrote to fds 1 and 2 was sent."""
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            with self.channel.lock:
                self.channel.verify()
                if all(_pending_bytes(fd) == 0 for fd in self.read_ends):
                    run = self.state.run
                    for index, decoder in enumerate(self.decoders):
                        rest = decoder.decode(b"", final=True)
                        if rest and run is not None:
                            name = self.NAMES[index]
                            self.channel.send({"k": "out", "run": run, "name": name, "text": rest})
                    return
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)


# --- rich output ------------------------------------------------------------------------------


def bounded_repr(value: Any) -> str:
    try:
        text = repr(value)
    except BaseException as err:  # a broken __repr__ must not end the run's report
        text = f"<repr failed: {type(err).__name__}>"
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS] + "..."
    return text


def _encoded(mime: str, data: Any) -> Any:
    """`data` as a frame carries it: binary images as base64 text; None when unusable."""
    if isinstance(data, tuple) and len(data) == 2:
        data = data[0]  # (data, metadata)
    if data is None:
        return None
    if mime in BINARY_MIMES:
        if isinstance(data, (bytes, bytearray, memoryview)):
            return base64.b64encode(bytes(data)).decode("ascii")
        return data if isinstance(data, str) else None
    if mime == "application/json":
        if isinstance(data, (bytes, str)):
            try:
                return json.loads(data)
            except ValueError:
                return None
        return data
    return data if isinstance(data, str) else None


def _figure_png(value: Any) -> str | None:
    """A matplotlib figure as base64 PNG (None for anything else)."""
    figure_module = sys.modules.get("matplotlib.figure")
    if figure_module is None or not isinstance(value, figure_module.Figure):
        return None
    buffer = io.BytesIO()
    value.savefig(buffer, format="png", bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mime_bundle(value: Any, limit: int, dropped: list[str]) -> dict[str, Any]:
    """The formats of `value`: text/plain always, and each `_repr_*_` its class defines."""
    bundle: dict[str, Any] = {"text/plain": bounded_repr(value)}
    found: dict[str, Any] = {}
    try:
        if callable(getattr(type(value), "_repr_mimebundle_", None)):
            result = value._repr_mimebundle_(include=None, exclude=None)
            if isinstance(result, tuple):
                result = result[0]
            if isinstance(result, dict):
                found.update((k, v) for k, v in result.items() if k in KNOWN_MIMES)
        for mime, method in REPR_METHODS:
            if mime not in found and callable(getattr(type(value), method, None)):
                found[mime] = getattr(value, method)()
        png = _figure_png(value)
        if png is not None:
            found["image/png"] = png
    except Exception as err:
        dropped.append(f"a _repr_*_ method raised {type(err).__name__}")
    return add_formats(bundle, found, limit, dropped)


def add_formats(
    bundle: dict[str, Any], found: dict[str, Any], limit: int, dropped: list[str]
) -> dict[str, Any]:
    """Adds the known, encodable, small enough formats of `found` to `bundle`."""
    budget = MAX_FRAME_BYTES - (1 << 20) - len(str(bundle.get("text/plain", "")))
    for mime, data in found.items():
        if mime not in KNOWN_MIMES:
            continue
        encoded = _encoded(mime, data)
        if encoded is None:
            continue
        try:
            size = len(json.dumps(encoded, ensure_ascii=True, allow_nan=False))
        except (TypeError, ValueError):
            dropped.append(f"{mime}: not JSON data")
            continue
        if size > limit or size > budget:
            dropped.append(f"{mime} of {size} bytes (over max_display_bytes={limit})")
            continue
        budget -= size
        bundle[mime] = encoded
    return bundle


def plain_data(value: Any) -> tuple[bool, Any]:
    """(True, value) when `value` is JSON data within bounds, else (False, None)."""
    items = [0]

    def plain(item: Any, depth: int) -> bool:
        items[0] += 1
        if items[0] > MAX_PLAIN_DATA_ITEMS or depth > MAX_PLAIN_DATA_DEPTH:
            return False
        if item is None or isinstance(item, (bool, str)):
            return True
        if isinstance(item, int):
            return abs(item) < 1 << 1000
        if isinstance(item, float):
            return item == item and item not in (float("inf"), float("-inf"))
        if isinstance(item, (list, tuple)):
            return all(plain(x, depth + 1) for x in item)
        if isinstance(item, dict):
            return all(isinstance(k, str) and plain(v, depth + 1) for k, v in item.items())
        return False

    try:
        if not plain(value, 0):
            return False, None
        if len(json.dumps(value, ensure_ascii=True, allow_nan=False)) > MAX_PLAIN_DATA_BYTES:
            return False, None
    except (TypeError, ValueError, RecursionError):
        return False, None
    return True, value


# --- errors -----------------------------------------------------------------------------------


def _type_name(err: BaseException) -> str:
    kind = type(err)
    module = getattr(kind, "__module__", "builtins")
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def bounded_lines(text: str) -> list[str]:
    lines = ANSI_ESCAPE.sub("", text).splitlines()
    if len(lines) > MAX_TRACEBACK_LINES:
        skipped = len(lines) - MAX_TRACEBACK_LINES
        lines = [f"... ({skipped} lines left out)", *lines[-MAX_TRACEBACK_LINES:]]
    return [line[:MAX_TRACEBACK_LINE_CHARS] for line in lines]


def error_frame(run: int, err: BaseException, traceback_text: str) -> dict[str, Any]:
    try:
        value = str(err)
    except Exception:
        value = "<str() failed>"
    return {
        "k": "error",
        "run": run,
        "name": _type_name(err)[:200],
        "value": value[:MAX_ERROR_VALUE_CHARS],
        "traceback": bounded_lines(traceback_text),
    }


def user_traceback(err: BaseException) -> str:
    """The traceback of `err` without the driver's own frames."""
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == THIS_FILE:
        tb = tb.tb_next
    if isinstance(err, SyntaxError):
        return "".join(traceback.format_exception_only(type(err), err))
    return "".join(traceback.format_exception(type(err), err, tb))


# --- kernels ----------------------------------------------------------------------------------

if TYPE_CHECKING:  # the driver runs on Python 3.8, where dict[...] cannot be evaluated
    Display = Callable[[dict[str, Any]], None]


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
            self.state.busy = True
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
                png = _figure_png(result)
                if png is not None:
                    found["image/png"] = png
                plain = {"text/plain": bounded_repr(result)}
                bundle = add_formats(plain, found, state.max_display_bytes, state.dropped)
                kernel.outcome.has_value = True
                kernel.outcome.value = result
                kernel.outcome.bundle = bundle

        shell_class = shell_module.InteractiveShell
        self.shell = shell_class.instance(displayhook_class=Hook, display_pub_class=Publisher)
        for scheme in ("nocolor", "NoColor"):
            try:
                self.shell.colors = scheme
                break
            except Exception:
                continue

        def show_traceback(etype: Any, evalue: Any, stb: Any) -> None:
            text = "\n".join(stb) if isinstance(stb, list) else str(stb)
            if isinstance(evalue, BaseException):
                kernel.outcome.error = (evalue, text)

        self.shell._showtraceback = show_traceback

    def run(self, source: str) -> Outcome:
        self.outcome = outcome = Outcome()
        try:
            self.state.busy = True
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
        except ImportError:
            if wanted == "ipython":
                raise
    return PlainKernel(state, display)


# --- the loop ---------------------------------------------------------------------------------


class Driver:
    def __init__(self, channel: Channel, hello: dict[str, Any]) -> None:
        self.channel = channel
        self.state = RunState(int(hello["max_output_bytes"]), int(hello["max_display_bytes"]))
        self.capture = Capture(channel, self.state)
        os.environ.setdefault("MPLBACKEND", "Agg")
        self.kernel = make_kernel(str(hello.get("kernel", "auto")), self.state, self._display)
        self.shown_figures: set[int] = set()

    def _display(self, bundle: dict[str, Any]) -> None:
        run = self.state.run
        if run is None:
            return
        self.state.displays += 1
        if self.state.displays > MAX_DISPLAYS_PER_RUN:
            if self.state.displays == MAX_DISPLAYS_PER_RUN + 1:
                self.state.dropped.append(f"displays after the first {MAX_DISPLAYS_PER_RUN}")
            return
        self.channel.send({"k": "display", "run": run, "data": bundle})

    def _open_figures(self) -> None:
        """Shows the matplotlib figures the run left open, as Jupyter's inline backend does."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        try:
            for number in pyplot.get_fignums():
                figure = pyplot.figure(number)
                self._display(mime_bundle(figure, self.state.max_display_bytes, self.state.dropped))
            pyplot.close("all")
        except Exception as err:
            self.state.dropped.append(f"open figures: {type(err).__name__}")

    def run(self, request: dict[str, Any]) -> None:
        run = int(request["run"])
        self.capture.restore()
        self.channel.verify()
        with self.channel.lock:
            self.state.run = run
            self.state.displays = 0
            self.state.dropped = []
            self.channel.sent_in_run = 0
            self.capture.begin()
        outcome = self.kernel.run(str(request["code"]))
        self._open_figures()
        self.capture.settle()
        self.capture.restore()
        if outcome.has_value:
            bundle = outcome.bundle
            if bundle is None:
                bundle = mime_bundle(
                    outcome.value, self.state.max_display_bytes, self.state.dropped
                )
            message: dict[str, Any] = {"k": "value", "run": run, "data": bundle}
            is_plain, data = plain_data(outcome.value)
            if is_plain:
                message["json"] = data
            self.channel.send(message)
        if outcome.error is not None:
            self.channel.send(error_frame(run, outcome.error[0], outcome.error[1]))
        with self.channel.lock:
            totals = self.capture.totals
            done = {
                "k": "done",
                "run": run,
                "count": outcome.count,
                "frames": self.channel.sent_in_run,
                "stdout_bytes": totals[0],
                "stderr_bytes": totals[1],
                "dropped": [note[:200] for note in self.state.dropped[:8]],
            }
            self.state.run = None
            self.channel.send(done)  # small: one atomic write to the pipe


def main() -> None:
    state_holder: list[RunState] = []

    def on_interrupt(signum: int, frame: Any) -> None:
        if state_holder and state_holder[0].busy:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    channel = Channel(_high_dup(0), _high_dup(1))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    hello = channel.read_request()
    if hello is None or hello.get("op") != "hello":
        return
    channel.token = bytes.fromhex(str(hello["token"]))
    try:
        driver = Driver(channel, hello)
    except BaseException as err:  # e.g. kernel="ipython" without IPython: say why, then end
        channel.send({"k": "fatal", "message": f"{_type_name(err)}: {err}"[:2000]})
        raise SystemExit(1) from None
    state_holder.append(driver.state)
    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    channel.send({"k": "ready", "kernel": driver.kernel.name, "python": sys.version.split()[0]})
    while True:
        request = channel.read_request()
        if request is None or request.get("op") == "close":
            return
        if request.get("op") == "run":
            driver.run(request)


if __name__ in ("__main__", "__aviato_driver__"):
    main()
