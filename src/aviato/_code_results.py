"""What a run of a code context returns: `Execution`, its `RichOutput`s and its `CodeError`.

`RunCollector` builds an `Execution` from the driver's frames. The frames come from the
sandbox and are treated as hostile: every field is checked for its type and cut to its bound
(output text to the context's ``max_output_bytes`` per stream, a traceback to 200 lines, all the
rich outputs of a run together to `MAX_DISPLAY_BYTES_PER_RUN`), and a frame that does not fit is
dropped, never trusted. Images stay base64 text until asked for (``RichOutput.png``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["CodeError", "Execution", "RichOutput", "RunCallbacks", "RunCollector"]

TEXT_MIMES = (
    "text/plain",
    "text/html",
    "text/markdown",
    "text/latex",
    "image/svg+xml",
    "image/png",
    "image/jpeg",
)
JSON_MIME = "application/json"
#: What `RichOutput` hands to the user's own notebook to render (no markup: see there).
SAFE_TO_RENDER = ("image/png", "image/jpeg", "text/plain")
MAX_DISPLAY_BYTES_PER_RUN = 64 << 20
MAX_DISPLAYS_PER_RUN = 256
MAX_TRACEBACK_LINES = 200
MAX_LINE_CHARS = 4096
MAX_ERROR_VALUE_CHARS = 64 << 10
MAX_NOTES = 16


@dataclass(frozen=True, slots=True)
class CodeError:
    """The exception the run's code raised: its type's ``name`` (``"ZeroDivisionError"``,
    ``"mymodule.MyError"``), its ``value`` (``str()`` of it) and the ``traceback`` as lines."""

    name: str
    value: str
    traceback: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.name}: {self.value}" if self.value else self.name


@dataclass(frozen=True, slots=True)
class RichOutput:
    """One rich output: an object passed to ``display(...)``, a figure left open, or the run's
    value (``is_result``). ``data`` maps MIME types to their content as sent (text; images as
    base64 text; ``application/json`` as data); the properties give each format decoded, or
    None when the object did not provide it."""

    data: Mapping[str, Any]
    is_result: bool = False

    def _text(self, mime: str) -> str | None:
        value = self.data.get(mime)
        return value if isinstance(value, str) else None

    def _image(self, mime: str) -> bytes | None:
        value = self._text(mime)
        if value is None:
            return None
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, Any]:
        """Shows the output in your own notebook (``display(execution.result)``): its PNG or
        JPEG image, else its text. HTML, SVG and Markdown are left out on purpose: rendered in
        your notebook, markup written by the sandbox's code could run script there, with your
        notebook's access to your machine. Render them yourself where you trust the code."""
        shown = {m: self.data[m] for m in SAFE_TO_RENDER if isinstance(self.data.get(m), str)}
        return shown or {"text/plain": ""}

    @property
    def formats(self) -> list[str]:
        """The MIME types present, e.g. ``["text/plain", "image/png"]``."""
        return list(self.data)

    @property
    def text(self) -> str | None:
        """``text/plain``: the object's ``repr``."""
        return self._text("text/plain")

    @property
    def html(self) -> str | None:
        return self._text("text/html")

    @property
    def markdown(self) -> str | None:
        return self._text("text/markdown")

    @property
    def latex(self) -> str | None:
        return self._text("text/latex")

    @property
    def svg(self) -> str | None:
        return self._text("image/svg+xml")

    @property
    def png(self) -> bytes | None:
        """The PNG image's bytes (decoded from the base64 it travelled as)."""
        return self._image("image/png")

    @property
    def jpeg(self) -> bytes | None:
        return self._image("image/jpeg")

    @property
    def json(self) -> Any:
        """``application/json`` (from ``_repr_json_``), as data."""
        return self.data.get(JSON_MIME)


@dataclass(frozen=True, slots=True)
class Execution:
    """The outcome of one `CodeContext.run`.

    - ``stdout``/``stderr``: what the run wrote (Python's ``print``, and anything written to
      fds 1 and 2, by programs it started too), at most the context's ``max_output_bytes`` each
      (then ``stdout_truncated``/``stderr_truncated``);
    - ``text``: the ``repr`` of the value of the code's last expression (None when the code does
      not end with an expression, or it is None); ``value``: that value itself when it is plain
      JSON data (None, bool, int, float, str, lists, dicts with str keys; at most 1 MiB), else
      None; ``result``: its `RichOutput`;
    - ``outputs``: the rich outputs in order (``display(...)`` calls, figures left open, then the
      value's);
    - ``error``: a `CodeError` when the code raised (also ``KeyboardInterrupt`` after an
      interrupt), else None; ``timed_out``: the run passed its ``timeout=`` and was interrupted;
    - ``execution_count``: the run's number in its context (1, 2, ...);
    - ``notes``: what the sandbox's answer left out (an image over ``max_display_bytes``, ...).
    """

    stdout: str = ""
    stderr: str = ""
    text: str | None = None
    value: Any = None
    outputs: tuple[RichOutput, ...] = ()
    error: CodeError | None = None
    execution_count: int = 0
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when the code ran to its end without raising."""
        return self.error is None

    @property
    def result(self) -> RichOutput | None:
        """The rich output of the last expression's value, if any."""
        return next((o for o in self.outputs if o.is_result), None)


@dataclass(frozen=True, slots=True)
class RunCallbacks:
    """What `CodeContext.run` calls as the run's output arrives (each may be None)."""

    on_stdout: Callable[[str], object] | None = None
    on_stderr: Callable[[str], object] | None = None
    on_output: Callable[[RichOutput], object] | None = None


def _text(value: object, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class RunCollector:
    """Gathers the frames of one run (loop-side) into an `Execution`."""

    def __init__(
        self, run: int, max_output_chars: int, callbacks: RunCallbacks | None = None
    ) -> None:
        self.run = run
        self._callbacks = callbacks or RunCallbacks()
        self.callback_error: BaseException | None = None  # the first a callback raised
        self._limit = max_output_chars
        self._streams: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._sizes = {"stdout": 0, "stderr": 0}
        self._cut = {"stdout": False, "stderr": False}
        self._outputs: list[RichOutput] = []
        self._display_bytes = 0
        self._text: str | None = None
        self._value: Any = None
        self._error: CodeError | None = None
        self._notes: list[str] = []
        self._frames = 0
        self.done: dict[str, Any] | None = None

    def note(self, text: str) -> None:
        text = text[:400]
        if len(self._notes) < MAX_NOTES and text not in self._notes:
            self._notes.append(text)

    def add(self, frame: dict[str, Any], size: int) -> None:
        """Takes one frame of this run (`size`: its length on the wire)."""
        kind = frame.get("k")
        if kind == "done":
            self.done = frame
            return
        self._frames += 1
        if kind == "out":
            self._add_output(frame.get("name"), frame.get("text"))
        elif kind in ("display", "value"):
            self._add_rich(frame, size, is_result=kind == "value")
        elif kind == "error":
            lines = frame.get("traceback")
            lines = lines[:MAX_TRACEBACK_LINES] if isinstance(lines, list) else []
            self._error = CodeError(
                name=_text(frame.get("name"), 200) or "Error",
                value=_text(frame.get("value"), MAX_ERROR_VALUE_CHARS),
                traceback=tuple(_text(line, MAX_LINE_CHARS) for line in lines),
            )

    def _add_output(self, name: object, text: object) -> None:
        if name not in self._streams or not isinstance(text, str) or not isinstance(name, str):
            return
        room = self._limit - self._sizes[name]
        if len(text) > room:
            self._cut[name] = True
            text = text[: max(0, room)]
        if text:
            self._streams[name].append(text)
            self._sizes[name] += len(text)
            callbacks = self._callbacks
            self._call(callbacks.on_stdout if name == "stdout" else callbacks.on_stderr, text)

    def _add_rich(self, frame: dict[str, Any], size: int, *, is_result: bool) -> None:
        data = frame.get("data")
        if not isinstance(data, dict):
            return
        if len(self._outputs) >= MAX_DISPLAYS_PER_RUN:
            self.note(f"rich outputs after the first {MAX_DISPLAYS_PER_RUN} were left out")
            return
        if self._display_bytes + size > MAX_DISPLAY_BYTES_PER_RUN:
            self.note(f"rich outputs past {MAX_DISPLAY_BYTES_PER_RUN >> 20} MiB were left out")
            return
        self._display_bytes += size
        kept = {m: v for m, v in data.items() if m in TEXT_MIMES and isinstance(v, str)}
        if JSON_MIME in data:
            kept[JSON_MIME] = data[JSON_MIME]
        output = RichOutput(MappingProxyType(kept), is_result=is_result)
        self._outputs.append(output)
        self._call(self._callbacks.on_output, output)
        if is_result:
            self._text = output.text
            self._value = frame.get("json")

    def _call(self, callback: Callable[[Any], object] | None, item: object) -> None:
        """Calls `callback(item)`; after one raised, none is called again (the error is kept)."""
        if callback is None or self.callback_error is not None:
            return
        try:
            callback(item)
        except Exception as err:
            self.callback_error = err

    def execution(self, *, timed_out: bool = False, timeout: float | None = None) -> Execution:
        done = self.done or {}
        sent = _count(done.get("frames"))
        if done and sent != self._frames:
            self.note(
                f"{abs(sent - self._frames)} frame(s) of this run were damaged on the way: "
                "something in the sandbox wrote into the interpreter's channel"
            )
        dropped = done.get("dropped")
        for item in dropped if isinstance(dropped, list) else []:
            if isinstance(item, str):
                self.note(f"left out: {item[:200]}")
        error = self._error
        if timed_out:
            error = CodeError(
                name="TimeoutError",
                value=f"the run passed its timeout of {timeout:g} s and was interrupted",
                traceback=error.traceback if error is not None else (),
            )
        limit = self._limit
        return Execution(
            stdout="".join(self._streams["stdout"]),
            stderr="".join(self._streams["stderr"]),
            text=self._text,
            value=self._value,
            outputs=tuple(self._outputs),
            error=error,
            execution_count=_count(done.get("count")),
            timed_out=timed_out,
            stdout_truncated=self._cut["stdout"] or _count(done.get("stdout_bytes")) > limit,
            stderr_truncated=self._cut["stderr"] or _count(done.get("stderr_bytes")) > limit,
            notes=tuple(self._notes),
        )
