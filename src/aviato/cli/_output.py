"""What the command prints: tables, JSON, ages, and the one-line error for every failure.

Tables go through rich only when stdout is a terminal. When it is a pipe, columns are padded
plain text with nothing truncated, so `aviato ls | grep` and `awk '{print $1}'` see whole ids;
rich would otherwise wrap or cut rows at an assumed width of 80.

Errors: every exception that leaves a command is turned by `describe()` into one line,
`aviato: error: ...`, and a status code (`CliError.exit_code`, 1 unless said otherwise). The full
traceback is shown only when AVIATO_DEBUG is set, for whoever is debugging aviato itself.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

DEBUG_ENV = "AVIATO_DEBUG"
EXAMPLE_ID = "sbx-1a2b3c4d5e6f"
ID_SHAPE = re.compile(r"sbx-[0-9a-f]{12}")


class CliError(Exception):
    """A failure already phrased for the user: printed as-is, exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def one_line(text: str) -> str:
    """Collapse whitespace and newlines so that a message stays a single line."""
    return " ".join(text.split())


def _grpc_message(exc: Any) -> str | None:
    """Phrase a grpc.RpcError (duck-typed: anything with code() and details())."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    if not callable(code_fn) or not callable(details_fn):
        return None
    code = code_fn()
    name = getattr(code, "name", str(code))
    details = one_line(str(details_fn() or ""))
    if name == "UNAVAILABLE":
        return f"the aviato service is unreachable ({details or 'no details'})"
    if name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        hint = "" if os.environ.get("AVIATO_API_KEY") else " (set AVIATO_API_KEY)"
        return f"the service refused the request: {details or name.lower()}{hint}"
    if name == "DEADLINE_EXCEEDED":
        return f"the aviato service did not answer in time ({details or 'deadline exceeded'})"
    if name == "NOT_FOUND":
        return details or "not found"
    return details or "the service refused the request"


def describe(exc: BaseException) -> str:
    """One line that tells a user what went wrong, without a traceback."""
    if isinstance(exc, CliError):
        return one_line(exc.message)
    grpc_text = _grpc_message(exc)
    if grpc_text is not None:
        return grpc_text
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, UnicodeEncodeError) and isinstance(exc.object, str):
        # Bytes that are not UTF-8 reach Python's argv as surrogate escapes; the service speaks
        # text (protobuf strings), so such an argument cannot be sent at all.
        raw = exc.object.encode("utf-8", "surrogateescape")
        shown = repr(raw if len(raw) <= 60 else raw[:60] + b"...")
        return (
            f"{shown} is not valid UTF-8: commands, paths, ids, tags and environment variables "
            "must be UTF-8 text"
        )
    sandbox_id = getattr(exc, "sandbox_id", None)
    if type(exc).__name__ == "SandboxNotFoundError" and sandbox_id:
        # whatever the command was doing, the id is what went wrong: say so, and what ids are
        if ID_SHAPE.fullmatch(sandbox_id):
            return f"no sandbox {sandbox_id} (deleted, or not yours; `aviato ls --all` lists yours)"
        return (
            f"no sandbox {sandbox_id!r}: sandbox ids look like {EXAMPLE_ID} (`aviato ls --all` "
            "lists yours)"
        )
    module = type(exc).__module__ or ""
    if module.startswith("aviato"):
        # The SDK's exceptions are written for users; their class name adds nothing. Some carry
        # a log excerpt after the first line: keep the first line and the excerpt's last.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if len(lines) > 2:
            lines = [lines[0], "…", lines[-1]]
        return one_line(" ".join(lines)) or type(exc).__name__
    text = one_line(str(exc))
    hint = f" (set {DEBUG_ENV}=1 for the traceback)"
    return f"{type(exc).__name__}: {text}{hint}" if text else f"{type(exc).__name__}{hint}"


def print_error(message: str) -> None:
    """Write `aviato: error: MESSAGE` on stderr, plain, so that scripts can match it."""
    sys.stderr.write(f"aviato: error: {one_line(message)}\n")
    sys.stderr.flush()


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], wrap: Sequence[str] = ()
) -> None:
    """Rows as columns: rich on a terminal, untruncated padded text on a pipe.

    On a narrow terminal only the columns named in `wrap` may wrap; the others (ids above all)
    keep their full width, since a cut id is worse than a wide table.
    """
    if sys.stdout.isatty():
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        for index, header in enumerate(headers):
            natural = max([len(header), *(len(row[index]) for row in rows)])
            if header in wrap:
                table.add_column(header, overflow="fold")
            else:
                table.add_column(header, no_wrap=True, min_width=natural)
        for row in rows:
            table.add_row(*row)
        stdout_console().print(table)
        return
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    for line in (headers, *rows):
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    """`key: value` lines, keys aligned, for one object (`aviato get`, `server status`)."""
    width = max((len(key) for key, _ in fields), default=0)
    for key, value in fields:
        sys.stdout.write(f"{(key + ':').ljust(width + 1)} {value}\n")


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def iso(when: dt.datetime | None) -> str | None:
    """UTC ISO-8601 with a Z, or None; the form used in --json output."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def age(when: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """A short human age such as `42s`, `5m`, `3h`, `2d`; `-` when unknown."""
    if when is None:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
