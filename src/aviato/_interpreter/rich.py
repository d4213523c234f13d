"""The driver's formatting of what user code produces: rich outputs (MIME bundles from the
`_repr_*_` methods Jupyter uses, matplotlib figures as PNG), plain JSON data, and errors with
their tracebacks; every piece cut to its bound. Standard library only; Python 3.8 or later.
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import traceback
from typing import Any

MAX_FRAME_BYTES = 32 << 20
MAX_TEXT_CHARS = 1 << 20
MAX_ERROR_VALUE_CHARS = 64 << 10
MAX_TRACEBACK_LINES = 200
MAX_TRACEBACK_LINE_CHARS = 4096
MAX_PLAIN_DATA_BYTES = 1 << 20
MAX_PLAIN_DATA_ITEMS = 100_000
MAX_PLAIN_DATA_DEPTH = 32

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
#: Frames of the driver's own modules (named so by the bootstrap) are left out of tracebacks.
DRIVER_FILES = "aviato-driver/"


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


def figure_png(value: Any) -> str | None:
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
        png = figure_png(value)
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


def type_name(err: BaseException) -> str:
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
        "name": type_name(err)[:200],
        "value": value[:MAX_ERROR_VALUE_CHARS],
        "traceback": bounded_lines(traceback_text),
    }


def _without_driver(summary: traceback.TracebackException) -> None:
    """Removes the driver's frames from `summary` and the exceptions chained to it."""
    seen: set[int] = set()
    current: traceback.TracebackException | None = summary
    pending: list[traceback.TracebackException] = []
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = [f for f in current.stack if not f.filename.startswith(DRIVER_FILES)]
        current.stack = traceback.StackSummary.from_list(frames)
        pending.extend(x for x in (current.__cause__, current.__context__) if x is not None)
        current = pending.pop() if pending else None


def user_traceback(err: BaseException) -> str:
    """The traceback of `err` without the driver's own frames (the ones that ran the code, and
    the SIGINT handler's that raised an interrupt)."""
    if isinstance(err, SyntaxError):
        return "".join(traceback.format_exception_only(type(err), err))
    summary = traceback.TracebackException(type(err), err, err.__traceback__)
    _without_driver(summary)
    text = "".join(summary.format())
    if not summary.stack:  # nothing of the user's: no empty header
        text = text.replace("Traceback (most recent call last):\n", "", 1)
    return text
